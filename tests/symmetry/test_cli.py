"""`qlnas symmetry verify`: exit codes and the per-stream table."""

from qlnas.cli import main
from qlnas.models.io import save_model_file
from tests.symmetry.helpers import small_model


def test_verify_derived_group_exits_zero(capsys):
    assert main(["symmetry", "verify", "qlnet26n_glb_none", "--trials", "1",
                 "--size", "32", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    for stream in ("stage1", "stage2", "stage3", "stage4", "all"):
        assert f"| {stream} |" in out
    assert "| gl | gl |" in out and "NO" not in out


def test_verify_gl_on_eq3_is_a_counter_example(tmp_path, capsys):
    path = tmp_path / "eq3.pt"
    save_model_file(path, small_model("eq3", "none"), "qlnet26n")
    assert main(["symmetry", "verify", str(path), "--group", "gl", "--trials", "1",
                 "--size", "32", "--batch", "1"]) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "dw reads it channel-wise" in out
    rows = [line for line in out.splitlines() if line.startswith("| stage")]
    assert rows and all(line.rstrip().endswith("| NO |") for line in rows)


def test_unknown_model_is_a_user_error(capsys):
    assert main(["symmetry", "verify", "no_such_model.pt"]) == 2
    assert "neither a model file nor a registered qlnet model name" in capsys.readouterr().err
