"""What both sides of the wire speak: frames, the two sans-IO stream protocols, attestations, registrations, sampling,
and the small one-question protocols (dial-back, listing).

The gateway and the provider node both import these modules; nothing here does I/O (node/stream_io.py moves the
bytes), and nothing here imports the provider's service code.
"""
