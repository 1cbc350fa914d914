"""Getting data in and out: layout readers and writers, tile decoding and its cache, and what
may be written."""
