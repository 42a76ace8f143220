"""Images in: robust decoding (io), dataset layouts, ELPV, the synthetic generator, preprocessing."""
