"""The main job: Twin-Merging on a real pretrained model and eight real tasks (issue #6)."""
