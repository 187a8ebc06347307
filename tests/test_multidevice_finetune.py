"""The fine-tuning job and the bf16 steps on 8-device meshes (tests/multidevice/test_finetune_mesh.py and
test_precision_mesh.py), in one process of their own."""

from test_multidevice import ROOT, run_on_8_devices


def test_finetune_on_meshes_passes_on_8_devices():
  run_on_8_devices("tests/multidevice/test_finetune_mesh.py", "tests/multidevice/test_precision_mesh.py")
  # Every file of tests/multidevice runs in one of the two 8-device processes (a new file must be added to one).
  files = sorted(p.name for p in (ROOT / "tests" / "multidevice").glob("test_*.py"))
  assert files == ["test_finetune_mesh.py", "test_precision_mesh.py", "test_sharding.py"], files
