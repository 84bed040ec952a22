"""Evaluation: perplexity by the standard protocol, lm-evaluation-harness tasks on the in-memory model (local
rolling-perplexity YAMLs and the offline zero-shot set), and `evaluate`, the `eval` stage."""
from .api import evaluate, format_summary
from .harness import check_limit, lm_eval_tasks, load_tasks, task_scores, tasks_dir
from .perplexity import default_eval_data, model_context, perplexity

__all__ = ["check_limit", "default_eval_data", "evaluate", "format_summary", "lm_eval_tasks", "load_tasks",
           "model_context", "perplexity", "task_scores", "tasks_dir"]
