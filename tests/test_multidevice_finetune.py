"""The fine-tuning job on 8-device meshes (tests/multidevice/test_finetune_mesh.py), in its own process."""

from test_multidevice import run_on_8_devices


def test_finetune_on_meshes_passes_on_8_devices():
  run_on_8_devices("tests/multidevice/test_finetune_mesh.py")
