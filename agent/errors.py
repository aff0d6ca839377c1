"""The agent's exception tree: every error the agent raises on purpose derives from EdgecvError.

Messages start with a capital letter, say what was wrong and what to do. Command-line entry points
print them as one line and exit non-zero; tracebacks only with --debug.
"""

from __future__ import annotations


class EdgecvError(Exception):
    """Base of every deliberate edgecv error (agent and tools)."""

    exit_code = 1


class ConfigError(EdgecvError):
    """The agent configuration is invalid; the message names the key path. A config with several problems raises one
    ConfigError listing them all; `problems` holds each one ("key.path: what is wrong")."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]


class CropError(ConfigError):
    """A region's crop does not fit its camera's frames (found when frames arrive: the frame size is not known
    before)."""


class BundleError(EdgecvError):
    """A model bundle is malformed, incomplete or unsafe."""


class BundleFormatError(BundleError):
    """The manifest or archive layout does not follow the bundle schema."""


class IntegrityError(BundleError):
    """An artifact's bytes do not match the sha256 the manifest binds."""


class SignatureError(BundleError):
    """The bundle is unsigned where a signature is required, or the signature does not verify."""


class UnsafeNameError(EdgecvError, ValueError):
    """An identifier from a message (transfer id, version, command name, archive member) is not a safe file name or
    topic level, or a path built from one would leave its root."""


class DocumentError(EdgecvError, ValueError):
    """A JSON document from a peer (push begin, manifest, signature, command) is too large, too deeply nested, not
    UTF-8 JSON, or one of its fields has the wrong type or is out of range; the message names the key path."""


class UnsafeArchiveError(BundleError):
    """An archive entry would escape the bundle (absolute path, '..', link, device) or is oversized."""


class IncompatibleBundleError(BundleError):
    """The bundle needs a newer agent, a runtime that is not installed, or has an unusable input spec."""


class SelfTestError(BundleError):
    """The bundle loaded but its self-test vectors did not give the expected results."""


class DowngradeError(BundleError):
    """A pushed bundle is older than the active one, or the same version with other content (anti-rollback)."""


class KeyFileError(EdgecvError):
    """A signing or verification key is missing or unreadable."""


class RuntimeUnavailableError(EdgecvError):
    """No installed inference runtime can run any artifact of the bundle."""


class InferenceError(EdgecvError):
    """The runtime failed while running a model."""


class CameraError(EdgecvError):
    """A camera source could not be opened or stopped delivering frames."""


class MqttError(EdgecvError):
    """The broker refused the connection or could not be reached."""


class SampleRequestError(EdgecvError):
    """A sample-collection request (cmd/samples, cmd/sample, cmd/samples.delete) with a field that cannot be used."""


class SampleStoreError(EdgecvError):
    """The device's sample store cannot do what was asked (sample missing, collection disabled, disk problem)."""


class StoreError(EdgecvError):
    """The on-device model store is unusable (no valid model, disk full, bad layout)."""


class NoModelError(StoreError):
    """The store is empty and no seed bundle is configured: a fresh device waits for its first push."""
