"""Real CIFAR-10 and a real pretrained VGG16 (../shared): the model must actually learn."""

import pytest

from tl_keras import config as config_lib
from tl_keras.training import run as train

from helpers import SHARED_DATA, SHARED_WEIGHTS, requires_shared

# Minutes of real VGG16 training: the slow tier.
pytestmark = pytest.mark.slow


@requires_shared()
def test_vgg16_learns_cifar10_subset(tmp_path):
    """2,000 training images, two short epochs per phase, 1,000 test images: chance is 10%."""
    config = config_lib.Config(
        model_dir=str(tmp_path / "run"), dataset="cifar10", data_dir=SHARED_DATA,
        train_split="train[:2000]", test_split="test[:1000]", validation_split=0.1, image_size=32,
        batch_size=32, backbone="vgg16", weights=SHARED_WEIGHTS, head_units=(256,), augment="flip",
        head_epochs=2, finetune_epochs=2, fine_tune_at="block5_conv1", finetune_learning_rate=2e-4,
        log_every_steps=0)
    metrics = train.run(config)
    assert metrics["stages"]["head"]["test_accuracy"] >= 0.25, metrics
    assert metrics["stages"]["finetune"]["test_accuracy"] >= 0.25, metrics
