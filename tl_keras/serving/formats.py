"""The export formats by name: the files each writes into a version directory, and the optional
packages each needs, checked before training so that a missing one costs seconds, not a run."""

import importlib

from tl_keras.config import EXPORT_FORMATS
from tl_keras.errors import UserError, first_line

SAVED_MODEL, TFLITE, TFLITE_INT8, ONNX, OPENVINO = EXPORT_FORMATS
# Each format's main file in the version directory (the SavedModel is the directory itself).
FILES = {
    TFLITE: "model.tflite",
    TFLITE_INT8: "model_int8.tflite",
    ONNX: "model.onnx",
    OPENVINO: "openvino/model.xml",  # With openvino/model.bin beside it.
}
# What writing and running a format needs beyond TensorFlow: import names, which are also the pip
# names. Keras's ONNX export goes through tf2onnx under TensorFlow; ONNX Runtime runs the parity check.
PACKAGES = {
    ONNX: ("tf2onnx", "onnx", "onnxruntime"),
    OPENVINO: ("openvino",),
}
INSTALL_HINT = 'pip install -e ".[deploy]"'


def resolve(export_formats, export_tflite: bool = False) -> tuple:
    """The formats to write, in EXPORT_FORMATS order: the SavedModel always (TF Serving and
    --mode=predict read it), and tflite for the --export_tflite alias."""
    wanted = {SAVED_MODEL, *export_formats} | ({TFLITE} if export_tflite else set())
    return tuple(name for name in EXPORT_FORMATS if name in wanted)


def import_package(name: str):
    """Import one optional package; a function of its own so tests can pretend it is absent."""
    return importlib.import_module(name)


def missing_packages(formats) -> dict:
    """{package: why it cannot be used} for the packages `formats` need: not installed, or failing
    to import with this TensorFlow, Keras and numpy (the import error's first line)."""
    missing = {}
    for name in dict.fromkeys(p for f in formats for p in PACKAGES.get(f, ())):
        try:
            import_package(name)
        except ModuleNotFoundError:
            missing[name] = "not installed"
        except Exception as e:  # A package that is there but breaks on import: say how.
            missing[name] = f"fails to import: {first_line(e)}"
    return missing


def check_packages(formats):
    """Raise a one-line UserError naming what to install when a format's packages are missing."""
    missing = missing_packages(formats)
    if not missing:
        return
    needing = [f for f in formats if set(PACKAGES.get(f, ())) & set(missing)]
    reasons = ", ".join(f"{name} ({why})" for name, why in missing.items())
    raise UserError(f"--export_formats={','.join(needing)} needs {reasons}; install the deploy extra: "
                    f"{INSTALL_HINT}, or pip install {' '.join(missing)}. "
                    f"Received: export_formats={','.join(formats)}")
