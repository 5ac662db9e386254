"""benchmarks/run.py works end to end: tiny shapes, every part, JSON fields filled in.

This proves the harness runs and records what it must; it times nothing meaningful.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
RUN = os.path.join(BENCH_DIR, "run.py")


@pytest.fixture
def run_module(monkeypatch):
    monkeypatch.syspath_prepend(BENCH_DIR)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("fastchar_bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_main(run_module):
    return run_module.main


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_table_and_plot(run_main, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["--quick", "--shapes", "2,4,8,16;1,3,5,7", "--cells", "lstm,rnn_relu"]
    argv += ["--impls", "reference,torch", "--parts", "layers,sample,train"]
    argv += ["--train-config", "2,8,16", "--sample-steps", "3"]
    argv += ["--json", str(out), "--plot", str(png)]
    assert run_main(argv) == 0
    printed = capsys.readouterr().out
    assert "fwd+bwd ms" in printed and "x reference" in printed

    data = json.loads(out.read_text())
    env = data["env"]
    for key in ("device", "cpu", "dtype", "threads", "torch", "triton", "python", "loadavg_end"):
        assert key in env
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["threads"] >= 1
    assert env["fastchar_commit"] and env["cpu"]

    rows = data["layers"]
    assert {(r["cell"], r["B"], r["impl"]) for r in rows} == {
        (c, b, i) for c in ("lstm", "rnn_relu") for b in (2, 1) for i in ("reference", "torch")
    }
    for r in rows:
        assert "error" not in r, r
        for mode in ("fwd", "fwd_bwd"):
            t = r[mode]
            assert _positive(t["median_ms"]) and t["repeats"] >= 3
            assert t["min_ms"] <= t["p25_ms"] <= t["median_ms"] <= t["p75_ms"]
            for key in (f"tokens_per_s_{mode}", f"gflops_{mode}", f"vs_torch_{mode}"):
                assert _positive(r[key]), key
            ratio = r[f"vs_reference_{mode}"]
            assert ratio == 1.0 if r["impl"] == "reference" else _positive(ratio)
    lstm = next(r for r in rows if r["cell"] == "lstm" and r["B"] == 2)
    assert lstm["gflops_fwd"] == pytest.approx(2 * 4 * 2 * 64 * 24 / lstm["fwd"]["median_ms"] / 1e6)

    assert {r["impl"] for r in data["sampling"]} == {
        "reference", "torch", "torch.nn T=1", "reference x16", "torch x16"
    }  # fmt: skip
    for r in data["sampling"]:
        assert _positive(r["ms_per_char"]) and _positive(r["vs_torch"])
        assert (r["batch"] == 16) == r["impl"].endswith("x16") == ("vs_batch1" in r)
    assert {(r["cell"], r["impl"]) for r in data["training"]} == {
        (c, i) for c in ("lstm", "rnn_relu") for i in ("reference", "torch")
    }
    for r in data["training"]:
        assert (r["batch"], r["block"], r["hidden"]) == (2, 8, 16)
        assert _positive(r["tokens_per_s"]) and _positive(r["vs_reference"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_run_times_torch_float32_alongside(run_main, tmp_path, capsys):
    """A bf16 run also times torch in float32 on the same case, so the targets set against
    torch's float32 are measured in the same process."""
    out = tmp_path / "bench.json"
    argv = ["--quick", "--dtype", "bfloat16", "--shapes", "2,4,8,16", "--cells", "lstm"]
    argv += ["--impls", "reference,torch", "--parts", "layers,train"]
    argv += ["--train-config", "2,8,16", "--json", str(out)]
    assert run_main(argv) == 0
    assert "x torch fp32" in capsys.readouterr().out
    data = json.loads(out.read_text())
    for part, ratio in (("layers", "vs_torch_fp32_fwd_bwd"), ("training", "vs_torch_fp32")):
        rows = {r["impl"]: r for r in data[part]}
        assert set(rows) == {"reference", "torch", "torch fp32"}
        assert rows["torch fp32"]["dtype"] == "float32" and rows["torch"]["dtype"] == "bfloat16"
        assert rows["torch fp32"][ratio] == 1.0
        assert all(_positive(r[ratio]) for r in rows.values())


def test_memory_part_in_a_fresh_process(run_main, tmp_path):
    out = tmp_path / "mem.json"
    argv = ["--quick", "--cells", "lstm", "--impls", "torch", "--parts", "memory"]
    argv += ["--train-config", "8,32,64", "--json", str(out)]
    assert run_main(argv) == 0
    (row,) = json.loads(out.read_text())["memory"]
    assert row["cell"] == "lstm" and row["impl"] == "torch" and "error" not in row
    assert (row["batch"], row["block"], row["hidden"]) == (8, 32, 64)
    # The step's logits alone take 8 * 32 * 96 * 4 bytes (0.09 MB); the LSTM saves far more.
    assert 0.09 < row["peak_mb"] < 100 and 0.09 < row["rss_mb"] < 100 and row["method"]
    assert row["rss_peak_mb"] > 10  # the whole process: torch alone is resident


def test_peak_tensor_bytes_counts_what_is_live_at_once(run_module):
    def step():
        keep = [torch.ones(1000) for _ in range(10)]  # 40,000 bytes live together
        del keep
        torch.ones(2000)  # 8,000 bytes, after the others are freed

    step()
    assert run_module._peak_tensor_bytes(step) == 40_000


def test_refuses_triton_interpreter(run_main, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert run_main(["--quick", "--parts", "layers"]) == 2
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1" in err and len(err.strip().splitlines()) == 1


def test_bad_shapes_is_one_line_error(run_main, capsys):
    assert run_main(["--shapes", "2,4,8", "--parts", "layers"]) == 2
    err = capsys.readouterr().err
    assert "--shapes" in err and "B,T,I,H" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--shapes", ""], "--shapes: no shapes in ''"),
        (["--threads", "100000"], "--threads must be in 1..1024"),
        (["--json", "/nonexistent-dir/x.json"], "--json /nonexistent-dir/x.json: no directory"),
        (["--json", "."], "--json .: is a directory"),
        (["--plot", "/nonexistent-dir/x.png"], "--plot /nonexistent-dir/x.png: no directory"),
        (["--json", ""], "--json : is empty, not a file name"),
        (["--json", "x.json/"], "--json x.json/: is a directory"),  # not a temp file's error
        (["--plot", "bench.txt"], "--plot bench.txt: the plot is a PNG: name a .png file"),
        (["--parts", "gemm"], "--parts gemm relates the layers part's cpp rows"),
    ],
)
def test_bad_flags_are_refused_before_the_run(run_main, capsys, argv, match):
    """Before the run: a results path found unwritable after it lost every result."""
    assert run_main(["--quick", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing timed
    assert match in captured.err and len(captured.err.strip().splitlines()) == 1


def test_nothing_left_to_run_is_an_error(run_main, capsys):
    assert run_main(["--quick", "--impls", "triton,triton", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("skipping impl triton") == 1  # a name given twice runs once
    assert captured.err.strip() == "benchmarks/run.py: no impl left to run on this machine"


def test_ctrl_c_is_one_line_and_no_results_file(run_module, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "bench_layers", interrupted)
    out = tmp_path / "bench.json"
    argv = ["--quick", "--impls", "torch", "--parts", "layers", "--json", str(out)]
    assert run_module.main(argv) == 130
    assert capsys.readouterr().err.strip() == "benchmarks/run.py: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_shape_too_large_fails_its_rows_and_the_run_goes_on(run_main, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--shapes", "1,1,1,100000000;2,4,8,16", "--cells", "rnn_tanh"]
    argv += ["--impls", "reference,torch", "--parts", "layers", "--json", str(out)]
    assert run_main(argv) == 1
    assert "FAILED inputs: " in capsys.readouterr().out
    rows = json.loads(out.read_text())["layers"]
    assert [("error" in r, r["H"]) for r in rows] == [(True, 10**8)] * 2 + [(False, 16)] * 2
    assert _positive(rows[2]["tokens_per_s_fwd_bwd"])


def test_a_sample_model_of_no_units_is_refused(run_main, capsys):
    with pytest.raises(SystemExit) as info:  # an argparse type error
        run_main(["--sample-model", "lstm,0,8"])
    assert info.value.code == 2
    assert "'lstm,0,8': expected CELL,LAYERS,HIDDEN with LAYERS and HIDDEN >= 1" in (
        capsys.readouterr().err
    )


def test_failing_impl_is_reported_and_exit_code_is_1(run_main, tmp_path, monkeypatch, capsys):
    import fastchar.ops

    real = fastchar.ops.lstm

    def broken_reference(*args, impl, **kwargs):
        if impl == "reference":
            raise RuntimeError("simulated kernel failure")
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(fastchar.ops, "lstm", broken_reference)
    out = tmp_path / "bench.json"
    argv = ["--quick", "--shapes", "2,4,8,16", "--cells", "lstm", "--impls", "reference,torch"]
    argv += ["--parts", "layers", "--json", str(out)]
    assert run_main(argv) == 1
    printed = capsys.readouterr()
    assert "FAILED" in printed.out and "simulated kernel failure" in printed.err
    rows = {r["impl"]: r for r in json.loads(out.read_text())["layers"]}
    assert "simulated kernel failure" in rows["reference"]["error"]
    assert "fwd" not in rows["reference"]
    assert rows["torch"]["vs_reference_fwd_bwd"] is None and _positive(
        rows["torch"]["vs_torch_fwd"]
    )


@pytest.mark.skipif(
    importlib.util.find_spec("fastchar._C") is None, reason="needs the C++ extension"
)
def test_gemm_part_relates_cpp_layers_to_the_engines(run_main, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--shapes", "2,3,4,40", "--cells", "gru", "--impls", "cpp,torch"]
    argv += ["--parts", "layers,gemm", "--json", str(out)]
    assert run_main(argv) == 0
    assert "GEMM limit" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["gemm_limit"]
    assert (row["cell"], row["B"], row["H"]) == ("gru", 2, 40)
    for key in ("layer_gflops", "step_gflops", "square_gflops", "of_step", "of_square"):
        assert _positive(row[key]), key
    assert math.isclose(row["of_step"], row["layer_gflops"] / row["step_gflops"])
    rates = row["engine_rates"]["fwd"]
    assert row["fwd_engine"] == max(rates, key=rates.get)
    assert "mkl" in rates and all(_positive(v) for v in rates.values())


def test_packed_and_proj_parts(run_module, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_module, "PACKED", dict(B=3, I=4, H=8, min_len=2, max_len=5))
    monkeypatch.setattr(run_module, "PROJ", [dict(B=2, T=3, I=4, H=8, P=3)])
    out = tmp_path / "bench.json"
    argv = ["--quick", "--impls", "reference,torch", "--parts", "packed,proj"]
    assert run_module.main(argv + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Packed: one LSTM layer" in printed and "LSTM with proj_size" in printed
    data = json.loads(out.read_text())
    packed = {(r["impl"], r["input"]) for r in data["packed"]}
    assert packed == {("reference", "packed"), ("torch", "packed")}  # padded: kernel impls only
    proj = data["proj"]
    assert {(r["impl"], r["H"], r["P"]) for r in proj} == {("reference", 8, 3), ("torch", 8, 3)}
    for r in data["packed"] + proj:
        assert _positive(r["fwd_bwd_ms"]) and "error" not in r
    assert next(r for r in proj if r["impl"] == "torch")["vs_torch"] == 1.0


@pytest.mark.parametrize("to", ["the group", "fastchar.bench alone"])
def test_ctrl_c_through_fastchar_bench_is_one_line_and_exit_130(to):
    """A terminal's Ctrl-C reaches fastchar.bench and run.py together; a SIGINT sent to
    fastchar.bench alone is passed on. Either way run.py says so once, and no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastchar.bench", "--shapes", "64,512,64,256", "--cells", "lstm",
         "--impls", "reference", "--parts", "layers"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        # as from a terminal: a suite started in the background (`make test &`) ignores
        # SIGINT, and an ignored SIGINT stays ignored in its children
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert "timing lstm" in proc.stderr.readline()  # run.py is timing
    if to == "the group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # nothing stopped it (the SIGINT was not passed on)
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "benchmarks/run.py: interrupted", err
    assert "Traceback" not in err
