"""tl_keras: two-phase transfer learning for keras.applications backbones.

Importing the package stays cheap (no TensorFlow) so that flag errors are fast.
"""

__version__ = "0.1.0"
