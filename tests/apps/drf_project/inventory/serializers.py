from rest_framework import serializers

from inventory.models import Product, StockMovement


class ProductSerializer(serializers.ModelSerializer):
    class Meta:
        model = Product
        fields = ("id", "sku", "name", "price", "quantity", "capacity", "updated")
        read_only_fields = ("updated",)


class StockMovementSerializer(serializers.ModelSerializer):
    class Meta:
        model = StockMovement
        fields = ("id", "product", "change", "created")


class RestockSerializer(serializers.Serializer):
    quantity = serializers.IntegerField(min_value=1)
