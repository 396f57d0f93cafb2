"""The user's own datasets (issue 37): image folders, CSV, NPZ and IDX files, listed, decoded and cached."""
