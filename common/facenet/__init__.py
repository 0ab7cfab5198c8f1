"""The pretrained face network facefed starts from: dlib's ResNet, its reader and its face chips."""
