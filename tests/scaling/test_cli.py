"""The fit/plan command lines: JSON out, the iso-loss plot, and one clear line (exit 2) for each bad input."""
import json

import pytest

from llmforge.scaling.__main__ import main
from tests.scaling.test_law import KNOWN, grid_points


def write_csv(path, rows, header="params,tokens,loss"):
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return str(path)


def run_main(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fit_prints_the_law_and_writes_json_and_plot(tmp_path, capsys):
    n, d, loss = grid_points(KNOWN)
    csv = write_csv(tmp_path / "results.csv", [(a, b, c, "x") for a, b, c in zip(n, d, loss)],
                    header="params,tokens,loss,note")   # extra columns are ignored
    rc, out, err = run_main(capsys, "fit", csv, "--out", str(tmp_path / "law.json"))
    assert rc == 0, err
    printed = json.loads(out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "law.json").read_text())
    for k in ("E", "A", "B", "alpha", "beta"):
        assert printed[k] == saved[k] == pytest.approx(getattr(KNOWN, k), rel=1e-4)
    assert "residual" in printed and printed["points"] == 36
    assert (tmp_path / "law.png").read_bytes()[:4] == b"\x89PNG"
    # the law file drives the planner
    rc, out, err = run_main(capsys, "plan", "--flops", "1e22", "--law", str(tmp_path / "law.json"), "--out-dir",
                            str(tmp_path / "plan"))
    assert rc == 0, err
    plan = json.loads(out.strip().splitlines()[-1][5:])
    assert plan["law"]["alpha"] == pytest.approx(KNOWN.alpha, rel=1e-4)
    assert plan["predicted_loss"] == pytest.approx(KNOWN.loss(plan["params"], plan["tokens"]), rel=1e-3)


@pytest.mark.parametrize("header,rows,message", [
    ("params,loss", [(1e7, 3.0)] * 6, "missing column(s) tokens"),
    ("params,tokens,loss", [(1e7, 1e9, 3.0)] * 5 + [(1e7, 0, 3.0)], "line 7: tokens must be a positive number"),
    ("params,tokens,loss", [(1e7, 1e9, 3.0)] * 5 + [(-1e7, 1e9, 3.0)], "line 7: params must be a positive"),
    ("params,tokens,loss", [(1e7, 1e9, 3.0)] * 5 + [(1e7, 1e9, "nan")], "line 7: loss must be a positive"),
    ("params,tokens,loss", [(1e7, 1e9, 3.0)] * 5 + [(1e7, "lots", 3.0)], "line 7: tokens 'lots' is not a number"),
    ("params,tokens,loss", [(1e7, 1e9, 3.0)] * 4, "4 point(s), but fitting E, A, B, alpha, beta needs at least 5"),
])
def test_bad_csv_gets_one_clear_line(tmp_path, capsys, header, rows, message):
    csv = write_csv(tmp_path / "bad.csv", rows, header)
    rc, out, err = run_main(capsys, "fit", csv, "--out", str(tmp_path / "law.json"))
    assert rc == 2
    assert message in err and str(tmp_path / "bad.csv") in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "law.json").exists() and not (tmp_path / "law.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--flops", "1e12"], "too small"),
    (["--flops", "-5"], "--flops must be a positive number"),
    (["--gpu-hours", "100", "--gpu", "v100"], "--gpu 'v100': unknown"),
    (["--flops", "1e21", "--gpu-hours", "10"], "exactly one budget"),
    (["--flops", "1e21", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--flops", "5.76e23", "--gpus", "8"], "do not fit on 8 x h100"),
    (["--flops", "1e21", "--law", "LAWFILE"], "missing key(s) beta"),
    (["--flops", "1e21", "no_such_key=1"], "unknown config key 'no_such_key'"),
])
def test_bad_plan_input_gets_one_clear_line(tmp_path, capsys, args, message):
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"E": 1.8, "A": 400, "B": 2000, "alpha": 0.3}))
    args = [str(law) if a == "LAWFILE" else a for a in args]
    rc, out, err = run_main(capsys, "plan", *args, "--out-dir", str(tmp_path / "plan"))
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "plan").exists()
    assert "PLAN" not in out

