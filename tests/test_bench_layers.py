"""experiments.bench.layers refuses what it cannot measure (the benchmark itself is not a test)."""

import pytest

from experiments.bench import layers as bench_layers


def test_profile_refuses_auto_instead_of_dropping_it(capsys):
    # auto may choose differently for SVFT^B and SVFT^P, so their difference is not the band's cost
    with pytest.raises(SystemExit):
        bench_layers.main(["--profile", "--strategies", "spectral", "auto", "--shapes", "8x8", "--tokens", "4"])
    assert "'auto' can choose differently" in capsys.readouterr().err
