"""Retrieval: the user's documents chunked, embedded and kept in ChromaDB, and passages put into prompts.

    qlora rag index --input docs/ --db rag-index          # build or update (unchanged files are skipped)
    qlora rag query --db rag-index "How do I ...?" -k 5   # passages with source, heading and score
    qlora chat --adapter runs/demo/final_adapter --rag rag-index

Modules, lowest first: `settings` (the defaults, each with a description), `chunks`
(documents -> token chunks that keep their file and heading), `embed` (the
sentence-transformers model), `store` (ChromaDB: an embedded folder or a server, one
complete generation of the index at a time), `keyword` (BM25 and rank fusion), `index`
(an index run), `retrieve` (questions -> passages), `prompt` (passages into a chat
prompt within the context, and the sources shown with the answer).
"""
