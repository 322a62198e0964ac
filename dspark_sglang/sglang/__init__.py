"""The engine adapter: the only package that imports sglang.

- `plugin`: the `sglang.srt.plugins` entry point (registration, DSPARK takeover);
- `spec_class`: our CustomSpecAlgo subclass and server-argument resolution;
- `settings`: plugin settings from env vars / JSON (pure);
- `signatures`: the table of SGLang internals we rely on, checked before registering;
- `worker`: the speculative worker the scheduler drives.
"""
