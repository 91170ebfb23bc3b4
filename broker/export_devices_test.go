package broker

// SetDeviceQueueLen gives b's device record writer a queue of n entries; call
// it between New and Start.
func SetDeviceQueueLen(b *Broker, n int) { b.devices.queue = newOpQueue(n) }
