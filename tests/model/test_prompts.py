"""Task prompts (paper Table 3): pytest -q tests/model/test_prompts.py"""
import pytest

from model.prompts import CONTROL_NAMES, PromptError, is_dual, render_prompt, split_task


def test_t2i_matches_table3_with_ascii_x():
    assert render_prompt("t2i", 512, 768, "a red circle") == (
        "Generate an image of 512x768 according to the following prompt:\na red circle"
    )
    assert render_prompt("t2i", 512, 768, "a red circle", sized=False) == (
        "Generate an image according to the following prompt:\na red circle"
    )


def test_dual_panel_templates_name_the_map_and_size():
    c = render_prompt("control:depth", 768, 768, "a cat")
    assert c.startswith("Generate a dual-panel image of 768x768 where the <upper half> shows a <depth map> image")
    assert c.endswith("following prompt: a cat")
    d = render_prompt("dense:hed", 256, 256, "a cat")
    assert "displays the image according to the following description: a cat" in d
    assert d.endswith("shows a <hed edge map> image according to the upper part.")
    e = render_prompt("edit", 256, 256, "a red star", instruction="make the red star blue")
    assert e.endswith("<upper half> displays an image: a red star, while the <lower half> shows an image "
                      "according to the upper part: make the red star blue")
    s = render_prompt("subject", 256, 256, "a red star on a grey background.", subject="a red star")
    assert "<upper half> displays: a red star, while" in s
    assert s.endswith("following prompt: a red star on a grey background.")  # one full stop, not two


def test_captions_are_flattened_to_one_line():
    assert render_prompt("t2i", 64, 64, "two\nlines  here").endswith("\ntwo lines here")


@pytest.mark.parametrize(
    "task,kwargs,msg",
    [
        ("control:sketch", {"caption": "x"}, "map must be one of"),
        ("dense", {"caption": "x"}, "map must be one of"),
        ("t2i:canny", {"caption": "x"}, "only control and dense"),
        ("video", {"caption": "x"}, "unknown task"),
        ("t2i", {"caption": "   "}, "non-empty caption"),
        ("edit", {"caption": "a"}, "non-empty instruction"),
        ("subject", {"caption": "a"}, "non-empty subject"),
    ],
)
def test_bad_tasks_and_fields_say_what_is_wrong(task, kwargs, msg):
    with pytest.raises(PromptError, match=msg):
        render_prompt(task, 64, 64, **kwargs)


def test_size_must_be_multiple_of_32():
    with pytest.raises(PromptError, match="multiples of 32"):
        render_prompt("t2i", 100, 64, "a")


def test_task_helpers():
    assert split_task("control:pose") == ("control", "pose")
    assert not is_dual("t2i") and is_dual("edit") and is_dual("dense:depth")
    assert set(CONTROL_NAMES) == {"canny", "depth", "hed", "pose"}
