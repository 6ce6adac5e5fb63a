"""The pretokenize flow on shapes panels with the shipped tiny MoVQGAN: pytest -q tests/flows/test_pretokenize.py"""
import pytest

from storage import open_dataset


@pytest.mark.slow
def test_flow_tokenizes_panels_with_artifacts(tmp_path, ray_local, prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.pretokenize import pretokenize
    from model.layout import Layout
    from tasks.panels.job import run_build
    from tasks.config import load_config

    over = [f"workdir={tmp_path}", "panels.source.count=12", "panels.rows_per_unit=12", "panels.stage_size=64",
            "tokenize.rows_per_unit=8"]
    cfg = load_config("configs/tiny.yaml", over)
    run_build(cfg, use_ray=False)
    summary = pretokenize("configs/tiny.yaml", over)
    assert summary["balanced"] and summary["rows_out"] == 12 and summary["rejects"] == 0
    ds = open_dataset(summary["dataset"], verify=True)
    layout = Layout.from_config(cfg.models)
    assert ds.manifest["status"] == "complete" and ds.meta["fingerprint"] == layout.fingerprint
    assert ds.meta["movqgan"]["weights"] == "movqgan-tiny.safetensors"
    assert ds.manifest["inputs"][0]["kind"] == "panels"
    row = ds[0]
    assert layout.parse_image(row["tokens"]).shape == (row["grid_h"], row["grid_w"]) == (8, 8)

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.key in ("tokens-per-bucket", "tokens-throughput")}
    assert "64x64" in arts["tokens-per-bucket"].data and "total" in arts["tokens-per-bucket"].data
    assert "samples/s" in arts["tokens-throughput"].data and "encode" in arts["tokens-throughput"].data

    again = pretokenize(config_path="configs/tiny.yaml", overrides=over)
    assert again["units_run"] == 0 and again["units_skipped"] == summary["units_total"] and again["rows_out"] == 12
