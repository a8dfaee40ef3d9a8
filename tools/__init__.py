"""Programs that drive tl_keras from outside, with their own flags: the benchmark and the GPU check."""
