"""tasks/assets/generated_codes.py: the code grids `panelforge generate` would draw, kept as codes."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from gen_fixtures import write_config, write_tiny_models  # noqa: E402


def test_the_pool_holds_the_codes_the_generate_job_decodes(tmp_path):
    """Each grid, decoded by the config's MoVQGAN, is the picture the generate job writes for the same
    pair and seed (t2i whole, a control row's lower panel): the pool is what the job draws."""
    import torch
    from safetensors import safe_open

    from model.movqgan import load_movqgan, to_uint8
    from tasks.assets.generated_codes import main
    from tasks.config import load_config
    from tasks.generate.job import GenerateWorker, output_uri
    from tasks.generate.requests import expand_inputs

    models = write_tiny_models(tmp_path / "models")
    shapes = {"kind": "shapes", "count": 4, "seed": 3, "tasks": ["t2i", "control:canny"], "size": "64x64"}
    path = write_config(tmp_path, models, {"inputs": shapes, "best_of": 1, "top_k": 16})
    out = tmp_path / "pool.safetensors"
    main(["--config", str(path), "--out", str(out), "generate.min_p=0.1"])

    with safe_open(str(out), "np") as f:
        assert list(f.keys()) == ["codes_8x8"]
        grids, meta = f.get_tensor("codes_8x8"), f.metadata()
    rows = json.loads(meta["rows"])
    assert grids.shape == (4, 8, 8) and grids.dtype == np.int32 and len(rows) == 4
    assert sorted(r["task"] for r in rows) == ["control:canny", "control:canny", "t2i", "t2i"]
    assert json.loads(meta["overrides"]) == ["generate.min_p=0.1"] and meta["movqgan"] == models[1]

    cfg = load_config(path, ["generate.min_p=0.1"])
    job_rows, rejects, _ = GenerateWorker(cfg.model_dump(), output_uri(cfg)).run_pairs(expand_inputs(cfg).pairs)
    assert not rejects
    movq = load_movqgan(models[1], "tiny")
    with torch.inference_mode():
        drawn = to_uint8(movq.decode(torch.as_tensor(grids, dtype=torch.long)))
    by_id = {r["id"]: r for r in job_rows}
    for row, image in zip(rows, drawn):
        job = by_id[row["id"].rsplit("|", 1)[0]]
        image = np.asarray(image)
        if row["task"] == "t2i":
            want = job["upper"]
        else:
            want, image = job["lower"], image[image.shape[0] // 2:]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(want)).convert("RGB")), image)


def test_a_pool_needs_a_safetensors_file(tmp_path, capsys):
    import pytest

    from tasks.assets.generated_codes import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "pool.pt")])
    assert e.value.code == 2 and "write a .safetensors file" in capsys.readouterr().err
