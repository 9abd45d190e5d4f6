"""Stage two's data: the loader (`loader.py`), dense frames stored or decoded (`dense_frames.py`), re-augmented views
(`reaugment.py`)."""
