"""dev/gpu_check.py, the proof of the CUDA paths for when a GPU is at hand, runs what the CPU allows here, so it
cannot rot before its first GPU: FlexAttention's forward against the dense reference at its awkward shapes, and
fused AdamW on FSDP2 DTensors with a DCP round trip. Its compiled DPO run and resume take ~1.5 min on this CPU:
`python dev/gpu_check.py --device cpu` runs everything."""

from dev import gpu_check


def test_gpu_check_runs_on_the_cpu(capsys):
    failed = gpu_check.main(["--device", "cpu", "--only", "flex", "--only", "adamw"])
    out = capsys.readouterr().out
    assert failed == 0, out
    assert out.count("PASS flex:") == 6 and "PASS adamw fused" in out and "PASS adamw dcp" in out, out
    assert "SKIP flex gradients" in out  # the CPU has no FlexAttention backward
