{
  "alg": "ed25519",
  "key_id": "f1bc82279dd44057",
  "sig": "8KxyT9W2B728pEvwDRvieU/wxioVZymQ6/c/RsSIbq1+UAGziGIyWomyb1Y024r7+1qbhGubRUD0iNresP3QAQ=="
}
