"""Tests for the backbone throughput benchmark (a small run without PyTorch)."""

from aqhash_jax.benchmarks import bench_backbone


def test_small_run_writes_every_row(tmp_path):
    output = tmp_path / "bench.md"

    code = bench_backbone.main(
        ["--batch", "4", "--size", "32", "--rounds", "1", "--chunk-size", "2", "--skip-torch",
         "--host-allocator", "system", "--output", str(output)]
    )

    assert code == 0
    text = output.read_text()
    assert "median round" in text
    for row in (
        "| jax native | forward |",
        "| jax fast | forward |",
        "| jax fast, chunks of 2 | forward |",
        "| jax native | forward+backward |",
        "| jax fast | forward+backward |",
    ):
        assert row in text, row
    assert "chunks of 2 | forward+backward" not in text
    assert "n/a" in text  # no PyTorch reference to compare with
    assert "host allocator system" in text


def test_skip_native_leaves_out_native_rows(tmp_path):
    output = tmp_path / "bench.md"

    code = bench_backbone.main(
        ["--batch", "2", "--size", "32", "--rounds", "1", "--skip-native", "--skip-torch",
         "--host-allocator", "system", "--output", str(output)]
    )

    assert code == 0
    text = output.read_text()
    assert "| jax fast | forward+backward |" in text
    assert "jax native" not in text
