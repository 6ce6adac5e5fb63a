"""Task prompt templates of Lumina-mGPT 2.0 (paper Table 3), one function for every task kind.

    python -c "from model.prompts import render_prompt; print(render_prompt('control:canny', 512, 512, caption='a red star'))"

Task names: "t2i", "control:<map>", "dense:<map>", "edit", "subject", "pair", where <map> is a key
of CONTROL_NAMES. Sizes are written with an ASCII `x` as the released code does (the paper prints a
multiplication sign). The width and height are those of the WHOLE image: for a dual panel the upper
and lower halves are each width x height/2 (REFERENCE.md, "Sequence layout").
"""
from __future__ import annotations

# The control-task names the release's prompts use (REFERENCE.md, "Task prompts").
CONTROL_NAMES: dict[str, str] = {
    "canny": "canny edge map",
    "depth": "depth map",
    "hed": "hed edge map",
    "pose": "pose estimation map",
}

TASK_KINDS = ("t2i", "control", "dense", "edit", "subject", "pair")

T2I = "Generate an image of {w}x{h} according to the following prompt:\n{caption}"
# 10% of the paper's text-to-image samples leave the size out of the prompt.
T2I_UNSIZED = "Generate an image according to the following prompt:\n{caption}"
SUBJECT = (
    "Generate a dual-panel image of {w}x{h} where the <upper half> displays: {subject}, while the "
    "<lower half> shows the image according to the object and following prompt: {caption}."
)
EDIT = (
    "Generate a dual-panel image of {w}x{h} where the <upper half> displays an image: {caption}, while "
    "the <lower half> shows an image according to the upper part: {instruction}"
)
CONTROL = (
    "Generate a dual-panel image of {w}x{h} where the <upper half> shows a <{control}> image, while the "
    "<lower half> displays the image according to the upper part and following prompt: {caption}"
)
DENSE = (
    "Generate a dual-panel image of {w}x{h} where the <upper half> displays the image according to the "
    "following description: {caption}, while the <lower half> shows a <{control}> image according to "
    "the upper part."
)
# Not in Table 3: two related images from text alone (DESIGN.md "image pairs generated from text
# alone"); written in the same dual-panel phrasing so the model reads it like its siblings.
PAIR = (
    "Generate a dual-panel image of {w}x{h} where the <upper half> displays: {caption}, while the "
    "<lower half> shows: {instruction}"
)


class PromptError(ValueError):
    """A task name or prompt field that cannot be rendered; the message says which and why."""


def split_task(task: str) -> tuple[str, str | None]:
    """'control:canny' -> ('control', 'canny'); 't2i' -> ('t2i', None). Raises PromptError."""
    kind, _, control = task.partition(":")
    if kind not in TASK_KINDS:
        raise PromptError(f"unknown task {task!r}: expected one of t2i, control:<map>, dense:<map>, edit, subject, pair")
    needs_map = kind in ("control", "dense")
    if needs_map and control not in CONTROL_NAMES:
        raise PromptError(f"task {task!r}: the map must be one of {sorted(CONTROL_NAMES)}")
    if not needs_map and control:
        raise PromptError(f"task {task!r}: only control and dense tasks take a ':<map>' suffix")
    return kind, (control or None)


def is_dual(task: str) -> bool:
    """Every task but text-to-image is a dual panel (upper over lower)."""
    return split_task(task)[0] != "t2i"


def _need(task: str, name: str, value: str | None) -> str:
    if value is None or not str(value).strip():
        raise PromptError(f"task {task!r} needs a non-empty {name}")
    return " ".join(str(value).split())  # one line: newlines inside a caption would break the template


def render_prompt(
    task: str,
    width: int,
    height: int,
    caption: str | None = None,
    *,
    instruction: str | None = None,
    subject: str | None = None,
    sized: bool = True,
) -> str:
    """The prompt of one sample.

    caption: the image description (t2i, control, dense, pair upper; edit: the source image).
    instruction: the edit instruction (edit) or the lower panel's description (pair).
    subject: the object description (subject). sized=False gives the unsized t2i variant.
    """
    kind, control = split_task(task)
    if width % 32 or height % 32 or width <= 0 or height <= 0:
        raise PromptError(f"task {task!r}: size {width}x{height} must be positive multiples of 32")
    w, h = int(width), int(height)
    cap = _need(task, "caption", caption)
    if kind == "t2i":
        return (T2I if sized else T2I_UNSIZED).format(w=w, h=h, caption=cap)
    if kind == "control":
        return CONTROL.format(w=w, h=h, control=CONTROL_NAMES[control], caption=cap)
    if kind == "dense":
        return DENSE.format(w=w, h=h, control=CONTROL_NAMES[control], caption=cap)
    if kind == "edit":
        return EDIT.format(w=w, h=h, caption=cap, instruction=_need(task, "instruction", instruction))
    if kind == "subject":
        return SUBJECT.format(w=w, h=h, subject=_need(task, "subject", subject), caption=cap.rstrip("."))
    return PAIR.format(w=w, h=h, caption=cap, instruction=_need(task, "instruction", instruction))
