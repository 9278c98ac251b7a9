"""Chat templates: a task's prompts wrapped as one user turn in the model's chat template (with the
assistant's turn opened), for instruction-tuned models. Applied to the task itself, so training,
evaluation and routing statistics all see the same text, and the task's data hash (which keys
cached contributions and scores) tells the two forms apart."""

from __future__ import annotations

from cairn.data.task import Example, Task
from cairn.errors import DataError


def chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def check_chat_template(tokenizer, where: str) -> None:
    """Refuse a chat template asked of a tokenizer that has none (a base model, not an instruct one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}, but the model's tokenizer has no chat template; turn it off for this model")


def as_chat(task: Task, tokenizer) -> Task:
    """`task` with every prompt in the chat template of `tokenizer`; answers unchanged (training
    ends them with the tokenizer's EOS, which for chat models closes the assistant's turn)."""
    check_chat_template(tokenizer, f"task {task.name!r}: chat_template is on")
    splits = {name: [Example(chat_prompt(tokenizer, ex.prompt), ex.answer) for ex in examples] for name, examples in task.splits.items()}
    return Task(task.name, task.metric, splits, task.extract)
