"""Textual autodiff for LLM pipelines: parameters, traced nodes, textual gradients, GDPO.

Build a pipeline from `Parameter`s, `LLMNode`s and `function_node`s inside a `Pipeline`
subclass, wrap it with data and a metric in a `Task`, then `train` it; `resume` continues a
stopped run. `ScriptedModel` stands in for a provider in tests. See the README.
"""

from autodiff.api import StepScore, TrainResult, resume, train
from autodiff.errors import (
    AutodiffError, ConfigError, DataError, LLMError, LLMFatalError, ParseError, StoreError, TooManyErrors,
)
from autodiff.graph import FunctionNode, LLMNode, Loss, UserCodeError, Value, function_node
from autodiff.llm.fake import ScriptedModel
from autodiff.parameter import Parameter
from autodiff.pipeline import Pipeline, Task, run_sample
from autodiff.store import Store

__all__ = [
    "train", "resume", "TrainResult", "StepScore",
    "AutodiffError", "ConfigError", "DataError", "LLMError", "LLMFatalError", "ParseError", "StoreError",
    "TooManyErrors", "UserCodeError", "FunctionNode", "LLMNode", "Loss", "Value", "function_node", "Parameter", "Pipeline", "Task",
    "run_sample", "ScriptedModel", "Store",
]
