import os
import subprocess
import sys

import pytest

from lowshot import cli
from lowshot.features import hostmem

# Tensors a little bigger each time, as a forward's activations and a decode's batches come and go: with glibc's
# defaults each one is a fresh mapping, zero-filled page by page on first touch.
CHURN = """
import resource, sys
import numpy as np
from lowshot.features.hostmem import keep_host_memory
applied = keep_host_memory()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(30):
    a, b = np.ones(3_000_000 + 1000 * i), np.ones(500_000)
    del a, b
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def churn(setting: str) -> tuple[bool, int]:
    env = {**os.environ, "LOWSHOT_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "1", int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_kept_host_memory_takes_a_fraction_of_the_page_faults():
    default_applied, default_faults = churn("default")
    applied, faults = churn("keep")
    assert not default_applied and applied
    assert faults * 5 < default_faults  # 1,265 against 25,297 where it was written


def test_it_is_a_no_op_off_linux_and_the_cli_applies_it(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # main() sets it when unset
    monkeypatch.setattr(hostmem.sys, "platform", "darwin")
    assert hostmem.keep_host_memory() is False
    calls = []
    monkeypatch.setattr(cli, "keep_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "app", lambda: None)
    cli.main()
    assert calls == [1]
