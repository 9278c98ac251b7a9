"""The Python API: each function does what its command does, on tiny-random."""

import json

import cairn


def test_train_evaluate_merge_mix_and_run(tmp_path):
    path = tmp_path / "alpha.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"alpha {i}?", "answer": f"a{i}", "split": s}) + "\n" for i in range(4) for s in ("train", "test")))
    manifest = cairn.train(str(path), tmp_path / "c1", base="tiny-random", epochs=1, batch_size=4, progress=False)
    assert manifest["task"] == "alpha" and (tmp_path / "c1" / "adapter_model.safetensors").is_file()
    cairn.train(str(path), tmp_path / "c2", base="tiny-random", epochs=1, batch_size=4, seed=1, progress=False)
    result = cairn.evaluate(tmp_path / "c1", str(path))
    assert result.n == 4 and 0 <= result.score <= 1
    stats = cairn.merge([tmp_path / "c1", tmp_path / "c2"], tmp_path / "m", base="tiny-random", method="ties", density=0.5, progress=False)
    assert stats["method"] == "ties" and (tmp_path / "m" / "model.safetensors").is_file()
    out = cairn.mix([tmp_path / "c1", tmp_path / "c2"], tmp_path / "x", base="tiny-random", router="centroid", progress=False)
    assert cairn.evaluate(out, str(path)).n == 4  # the mixture loads wherever a model spec is taken
    config = {"name": "api", "base": "tiny-random", "tasks": [str(path)], "probe": None, "train": {"epochs": 1, "batch_size": 4},
              "strategies": [{"name": "seq", "kind": "sequential"}]}  # fmt: skip
    results = cairn.run(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(results["strategies"]["seq"]["R"]) == 2 and (tmp_path / "run" / "summary.md").is_file()


def test_import_cairn_stays_light():
    import subprocess
    import sys

    code = "import sys, cairn; assert 'torch' not in sys.modules; cairn.API"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
