"""The command line: ``check`` prints its table and succeeds; ``bench`` runs on CPU at a tiny shape."""

from xlstm_jax.cli import main


def test_check_runs(capsys):
    rc = main(["check", "--shape", "1,2,20,16,16", "--reps", "1", "--kernels", "chunkwise_native", "recurrent_native"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "chunkwise_native" in out and "all within" in out


def test_bench_runs(capsys, tmp_path):
    path = tmp_path / "bench.json"
    rc = main(["bench", "--shapes", "1,64", "--heads", "1,16,16", "--reps", "1", "--dtype", "float32",
               "--kernels", "chunkwise_native:chunk_size=16", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "chunkwise_native:chunk_size=16" in out and path.exists()


def test_unknown_kernel_option_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="takes no option"):
        main(["bench", "--shapes", "1,64", "--heads", "1,16,16", "--reps", "1",
              "--kernels", "chunkwise_native:chunksize=16"])
