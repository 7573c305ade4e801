"""Server defaults that the CLI needs before anything heavy (FastAPI) is imported."""

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # a 1M-character prompt, or ~500k token ids, fits
DEFAULT_BODY_READ_TIMEOUT_S = 30.0
