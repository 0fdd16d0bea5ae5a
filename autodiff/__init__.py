"""Textual autodiff for LLM pipelines: parameters, traced nodes, textual gradients, GDPO."""

from autodiff.errors import AutodiffError, ConfigError, DataError, LLMError, ParseError, StoreError
from autodiff.graph import FunctionNode, LLMNode, Loss, Value, function_node
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task, run_sample

__all__ = [
    "AutodiffError", "ConfigError", "DataError", "LLMError", "ParseError", "StoreError",
    "FunctionNode", "LLMNode", "Loss", "Value", "function_node", "Parameter", "Pipeline", "Task",
    "run_sample",
]
