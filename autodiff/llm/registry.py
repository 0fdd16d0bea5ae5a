"""Turn `provider:model` names into providers. Providers are built once per run and shared."""

from __future__ import annotations

from autodiff.config import PROVIDERS, check_model_spec
from autodiff.errors import ConfigError
from autodiff.llm.types import Provider


def make_provider(name: str, **options) -> Provider:
    if name == "openai":
        from autodiff.llm.openai_provider import OpenAIProvider

        return OpenAIProvider(**options)
    if name == "anthropic":
        from autodiff.llm.anthropic_provider import AnthropicProvider

        return AnthropicProvider(**options)
    if name == "local":
        from autodiff.llm.local_provider import LocalProvider

        return LocalProvider(**options)
    if name == "fake":
        from autodiff.llm.fake import FakeProvider

        return FakeProvider(**options)
    raise ConfigError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")


def check_model(spec: str) -> None:
    """Check a model spec before anything is stored or asked: a known provider, and for the
    embedded provider a model name it knows or a GGUF file that exists. Raises ConfigError
    naming the problem and what to do. Keys are checked when a provider is made, and whether
    the model answers by the run's preflight."""
    if provider_of(spec) == "local":
        from autodiff.llm.local_provider import resolve_model_path

        resolve_model_path(spec)


def provider_of(spec: str) -> str:
    try:
        check_model_spec(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return spec.split(":", 1)[0]
