{
  "alg": "ed25519",
  "key_id": "f1bc82279dd44057",
  "sig": "4QQMQ0LtugUu6r7gXrU9kxMM4ZsZ1xXzO7HqwcmhmLzYjTLeu1U0MaVrCcRToVz1Fml3S9RFCIClVoWQw7lRCA=="
}
