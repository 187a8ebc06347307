"""The fine-tuning job and the bf16 steps on 8-device meshes (tests/multidevice/test_finetune_mesh.py and
test_precision_mesh.py), in one process of their own."""

from test_multidevice import MESH_JOB_FILES, run_on_8_devices


def test_finetune_on_meshes_passes_on_8_devices():
  run_on_8_devices(*MESH_JOB_FILES)
