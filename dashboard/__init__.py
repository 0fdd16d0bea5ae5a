"""Streamlit helpers shared by the pages. The engine (autodiff/) never imports this."""
