package ca

import "time"

// renewFraction is the share of an intermediate's lifetime after which it is
// replaced. Renewing at two thirds leaves a third of the lifetime as overlap,
// during which certificates chained to the old intermediate keep verifying.
const renewFraction = 2.0 / 3.0

// ShouldRotate reports whether a certificate valid from notBefore to notAfter
// is due for renewal at now.
func ShouldRotate(now, notBefore, notAfter time.Time) bool {
	return !now.Before(RotationTime(notBefore, notAfter))
}

// RotationTime is the moment a certificate valid from notBefore to notAfter
// becomes due for renewal.
func RotationTime(notBefore, notAfter time.Time) time.Time {
	life := notAfter.Sub(notBefore)
	return notBefore.Add(time.Duration(float64(life) * renewFraction))
}
