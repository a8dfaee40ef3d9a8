"""Where examples come from and how they become batches: TFDS, folders, tf.data, the feature cache."""
