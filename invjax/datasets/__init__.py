"""invjax's own tensorflow-datasets builders, for data sets the TFDS catalog lacks.

Importing a builder's module registers it with tfds under its name. This package is part
of the shell around the core: it imports tensorflow-datasets, and is only imported when a
run reads one of these data sets (see `input_pipeline.load_tfds`).
"""

# tfds name -> module that defines (and so registers) its builder.
BUILDERS = {
    "tiny_imagenet": "invjax.datasets.tiny_imagenet",
}
