"""Model file formats: catalog.py says what each is called and says about itself (no TensorFlow); runtime.py
writes, opens and runs each. A new format touches those two files."""
