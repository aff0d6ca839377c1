"""`edgecv label`: a local web page that sorts a collected dataset's `_unlabelled` images into class folders
(docs/DATASETS.md). `store` does the moves and undo, `journal` keeps `_labels.log`, `server` is the HTTP side,
`images` makes thumbnails, `page.html` is the page."""
