"""tasks/assets/movqgan_psnr.py: MoVQGAN files' PSNR side by side on the same pictures."""
import json

import pytest
import torch

from model.movqgan import TINY_ASSET, load_movqgan, save_movqgan
from tasks.assets.movqgan_psnr import main


def test_a_worse_movqgan_scores_lower_on_the_same_pictures(tmp_path):
    worse = load_movqgan(TINY_ASSET, preset="tiny").float()
    with torch.no_grad():  # blur what the decoder half draws: noise on its last convolution
        last = [m for m in worse.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.add_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    save_movqgan(worse, tmp_path / "worse.safetensors")
    out = tmp_path / "psnr.json"
    main([str(TINY_ASSET), str(tmp_path / "worse.safetensors"), "--images", "2", "--out", str(out)])
    files = json.loads(out.read_text())["files"]
    shipped, noisy = files[str(TINY_ASSET)], files[str(tmp_path / "worse.safetensors")]
    assert set(shipped) == {"psnr_128", "psnr_64", "codes_used_128", "codes_used_64"}
    assert shipped["psnr_128"] > 20 and noisy["psnr_128"] < shipped["psnr_128"] - 1


def test_a_missing_file_is_refused_before_any_is_measured(tmp_path, monkeypatch):
    import tasks.assets.movqgan_psnr as tool

    monkeypatch.setattr(tool, "evaluate", lambda *a, **k: pytest.fail("a file was measured before the check"))
    out = tmp_path / "psnr.json"
    with pytest.raises(FileNotFoundError, match="no MoVQGAN file at .*absent.safetensors"):
        main([str(TINY_ASSET), str(tmp_path / "absent.safetensors"), "--out", str(out)])
    assert not out.exists()
