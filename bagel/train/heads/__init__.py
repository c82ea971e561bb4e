"""Draft-head (Medusa, MTP) training: losses (`losses`), corpora (`corpus`), a small loop (`loop`)."""
