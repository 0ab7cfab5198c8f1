"""The on-device recogniser: detect, align and embed faces, and keep their templates encrypted."""
