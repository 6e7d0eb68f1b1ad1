"""What a sweep asks for and what a run is: the sweep-file schema and its validation (config), run
identity and key migration (identity), named presets, and the provenance every row records."""
