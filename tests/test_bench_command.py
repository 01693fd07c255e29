"""`rsa bench` end to end on the tiny grid: the four files, every case measured, the report's
ratios and exponents computed from those measurements. Nothing about speed is asserted."""
import importlib.util
import json
import math

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("matplotlib")

from rsa.bench.fit import fit_exponents  # noqa: E402
from rsa.bench.grid import RISKS, TINY_RISKS, make_grid  # noqa: E402
from rsa.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: a smoke run, and steady when the CI machine runs other work beside it
    rc = main(["bench", "--grid", "tiny", "--device", "cpu", "--threads", "1", "--out", str(out)])
    return out, rc


def test_writes_the_four_files_with_every_measurement(bench_out):
    out, rc = bench_out
    for name in ("results.json", "report.md", "time.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert rc == 0, [m.get("errors") for m in res["measurements"] if m.get("errors")]
    assert res["device"] == "cpu" and res["machine"]["device_name"].startswith("CPU")
    assert res["machine"]["versions"]["torch"]
    cases, _, rounds = make_grid("tiny", "cpu", res["backends"], liger=any(
        m["impl"] == "liger" for m in res["measurements"]))
    assert [m["id"] for m in res["measurements"]] == [c.id for c in cases]
    impls = {m["impl"] for m in res["measurements"]}
    assert {"plain", "compiled", *res["backends"]} <= impls   # both speed baselines, measured
    assert "naive" not in impls and "reference" not in impls  # the oracle is never a speed baseline
    for m in res["measurements"]:
        for phase in ("forward", "backward"):
            assert m[phase]["rounds"] == rounds and m[phase]["median_s"] > 0, (m["id"], phase)
        assert m["peak_bytes"] >= 0 and m["input_bytes"] > 0, m["id"]
    # the report's table cells come from results.json: plain's forward+backward time, in ms
    plain = next(m for m in res["measurements"] if m["impl"] == "plain" and m["path"] == "token_stats")
    ms = (plain["forward"]["median_s"] + plain["backward"]["median_s"]) / 1e-3
    report = (out / "report.md").read_text()
    assert f"{ms:.3g} ms" in report
    assert "fitted exponents" in report and "Not measured" not in report
    # the paste-ready tables: each kernel cell names both baselines, and the command is given
    tables = report.split("## Tables for the README")[1]
    assert "rsa bench --grid tiny --device cpu --threads 1" in tables
    kernel = next(m for m in res["measurements"] if m["impl"] == res["backends"][0] and m["risk"] == "kl"
                  and m["path"] == "token_stats" and (m["n"], m["v"]) == (plain["n"], plain["v"]))
    k_ms = (kernel["forward"]["median_s"] + kernel["backward"]["median_s"]) / 1e-3
    assert f"{k_ms:.3g} ms ({ms / k_ms:.2f}x plain, " in tables, tables


def test_liger_baseline_runs_when_installed(bench_out):
    if importlib.util.find_spec("liger_kernel") is None:  # (importing it here would cost seconds)
        pytest.skip("liger-kernel is not installed")
    res = json.loads((bench_out[0] / "results.json").read_text())
    lig = [m for m in res["measurements"] if m["impl"] == "liger"]
    assert lig and all(m["objective"] == "dpo" and not m.get("errors") for m in lig)


def test_fit_recovers_known_exponents():
    pts = [({"n": n, "v": v, "h": 1}, 3.0 * n ** 1.0 * v ** 0.5) for n in (8, 32, 128) for v in (64, 256)]
    got = fit_exponents(pts)
    assert math.isclose(got["n"], 1.0, abs_tol=1e-9) and math.isclose(got["v"], 0.5, abs_tol=1e-9)
    assert "h" not in got  # H was not varied: no exponent for it
    assert fit_exponents(pts[:1]) is None


def test_grids_cover_every_risk_and_the_liger_baseline():
    cases, _, _ = make_grid("quick", "cpu", ["torch", "cpu"], liger=True)
    assert {c.risk for c in cases if c.path == "token_stats"} == set(RISKS)
    assert {c.impl for c in cases if c.objective == "dpo"} == {"torch", "cpu", "plain", "compiled", "liger"}
    # both speed baselines for every risk at the headline point the README quotes; the quick
    # grid leaves the slow torch fallback out there, the full grid keeps it
    at = [c for c in cases if c.path == "token_stats" and (c.n, c.v) == (1024, 32000)]
    assert {(c.impl, c.risk) for c in at} == {(i, r) for i in ("cpu", "plain", "compiled") for r in RISKS}
    full = make_grid("full", "cpu", ["torch", "cpu"], liger=True)[0]
    assert {c.impl for c in full if c.path == "token_stats" and (c.n, c.v) == (1024, 32000)} == {
        "torch", "cpu", "plain", "compiled"}
    assert all(c.impl != "compiled" or c in at for c in cases if c.path == "token_stats")
    gpu, _, _ = make_grid("quick", "cuda", ["triton", "torch"], liger=True)
    assert {c.dtype for c in gpu} == {"bfloat16"}
    assert {(c.path, c.objective, c.risk) for c in gpu if c.impl == "compiled"} == {
        *(("token_stats", "", r) for r in RISKS), ("fused_linear", "rsa2", "cvar:0.9"), ("fused_linear", "dpo", "kl")}
    assert {c.risk for c in make_grid("tiny", "cpu", ["torch"], liger=False)[0]} == set(TINY_RISKS)
    with pytest.raises(ValueError, match="mode"):
        make_grid("huge", "cpu", ["torch"], liger=False)
