"""Pure market decisions: no sockets, no files, no clock reads (time is passed in)."""
