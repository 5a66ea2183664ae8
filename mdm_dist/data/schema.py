"""The MDS record layout shared by the writer (data_prep/encode_laion.py) and the reader
(mdm_dist/data/loader.py). One record per image-caption pair:

    key         str      source key (img2dataset KEY, parquet key column or row, file stem)
    caption     str      the cleaned caption
    ids         int32    caption token ids, unpadded, at most vae.max_text_len
    img_mu      float16  (N, d_z) posterior mean of the frozen VAE image encoder
    img_logvar  float16  (N, d_z) posterior log-variance
    category    int      class / task category (0 when the source has none)
    source      str      the input shard the record came from
"""

COLUMNS: dict[str, str] = {
    "key": "str", "caption": "str", "ids": "ndarray:int32", "img_mu": "ndarray:float16",
    "img_logvar": "ndarray:float16", "category": "int", "source": "str",
}
