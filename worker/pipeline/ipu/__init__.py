"""The IPU backend (poptorch), by job: `sizing` maps a preset onto the host (no compile), `backend`
compiles the model into one executable and serves the Backend protocol over it. poptorch is optional:
import these modules only for an IPU preset."""
